"""The national shared-document types and their LOINC document codes (a code table, no I/O).

The region exchanges the document kinds of the national EHR shared-document specification
(WS/T 500 电子病历共享文档规范). Each has a code in the exchange's own system
`urn:hie:shared-document-type`, a Chinese display, a class (`urn:hie:document-class`, used as
XDS classCode / FHIR DocumentReference.category) and, where LOINC has a document code for it,
that LOINC code. A hospital may submit either code; the registry records the LOINC code as the
type when one exists and the shared type alongside, so a query by either finds the document.
"""

from __future__ import annotations

from dataclasses import dataclass

LOINC = "http://loinc.org"
SHARED_TYPE_SYSTEM = "urn:hie:shared-document-type"
CLASS_SYSTEM = "urn:hie:document-class"


@dataclass(frozen=True)
class SharedDocumentType:
    code: str
    display: str
    class_code: str
    loinc: str = ""
    loinc_display: str = ""


# Classes: clinical notes (病历记录), reports of investigations (报告), summaries (小结).
CLASS_DISPLAY = {"clinical-note": "病历记录", "report": "检查检验报告", "summary": "小结"}

SHARED_DOCUMENT_TYPES: tuple[SharedDocumentType, ...] = (
    SharedDocumentType("outpatient-record", "门（急）诊病历", "clinical-note", "34108-1", "Outpatient Note"),
    SharedDocumentType("discharge-summary", "出院小结", "summary", "18842-5", "Discharge summary"),
    SharedDocumentType("lab-report", "检验报告", "report", "11502-2", "Laboratory report"),
    SharedDocumentType("examination-report", "检查报告", "report", "18748-4", "Diagnostic imaging study"),
    SharedDocumentType("consultation-record", "会诊记录", "clinical-note", "11488-4", "Consult note"),
    SharedDocumentType("referral-record", "转诊记录", "clinical-note", "57133-1", "Referral note"),
    SharedDocumentType("ecg-report", "心电图报告", "report", "11524-6", "EKG study"),
    SharedDocumentType("pathology-report", "病理报告", "report", "11526-1", "Pathology study"),
    # LOINC has no general ultrasound document code in use here: the shared type alone.
    SharedDocumentType("ultrasound-report", "超声检查报告", "report"),
)
BY_SHARED_CODE = {t.code: t for t in SHARED_DOCUMENT_TYPES}
BY_LOINC = {t.loinc: t for t in SHARED_DOCUMENT_TYPES if t.loinc}


def shared_type_of(system: str, code: str) -> SharedDocumentType | None:
    """The shared type a submitted type coding names: a shared code, or a LOINC code in the table.

    A code without a system is looked up in both tables (shared codes and LOINC codes cannot
    collide: LOINC codes are digits and a check digit)."""
    if system in {"", SHARED_TYPE_SYSTEM} and code in BY_SHARED_CODE:
        return BY_SHARED_CODE[code]
    if system in {"", LOINC} and code in BY_LOINC:
        return BY_LOINC[code]
    return None
