"""The exchange's console assertion key: it signs, for a person signed in to the console, the
same user assertion a hospital system signs for its users (services/shared/user_assertion.py).

Why the exchange signs and not the organisation: the organisation's private keys never leave the
organisation, and the person authenticated to the exchange, so the exchange is the party that
can vouch for them. The access token issued to the person (gateway-signed) lists this key's
thumbprint as the only `client_jkt`, so an assertion of this key is accepted only with a console
token, and a hospital's own key cannot speak for a console user (nor this key for a hospital's
machine token). Every service verifies it with no change, and the audit log names the person.

The key file is shared by every gateway replica (it lives beside `gateway.pem`, provisioned the
same way); it is created on first use in development.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.client import Practitioner, user_assertion
from services.shared.keys import generate_ec_key, load_private_key, public_jwk, write_private_key
from services.teleconsult import report

CONSOLE_KEY_FILE = "console.pem"
# A console assertion covers one API call: ConsoleApi.call signs a new one (a new jti) for every
# call, since the gateway takes each jti once; the services accept at most five minutes.
ASSERTION_LIFETIME_SECONDS = 120


class AssertionSigner:
    """Signs user assertions for console users with the console key."""

    def __init__(self, key_file: Path) -> None:
        if not key_file.exists():
            write_private_key(key_file, generate_ec_key())
        self._key = load_private_key(key_file)
        self.thumbprint: str = public_jwk(self._key)["kid"]

    @classmethod
    def beside(cls, gateway_key_file: Path) -> AssertionSigner:
        return cls(gateway_key_file.parent / CONSOLE_KEY_FILE)

    def sign(self, *, client_id: str, practitioner: Practitioner, purpose: str) -> str:
        return user_assertion(
            key=self._key,
            client_id=client_id,
            practitioner=practitioner,
            purpose=purpose,
            lifetime=ASSERTION_LIFETIME_SECONDS,
        )

    def sign_report(self, resource: dict[str, Any]) -> str:
        """The detached JWS of a consultation report a specialist signs in the console.

        The console key signs, as it signs the person's user assertion: the organisation's
        private keys never reach the exchange, and the person authenticated to it. The
        teleconsultation service accepts it because the console token's `client_jkt` names this
        key (the organisation's registered keys do not include it, so the report verifies with the
        console key, not with the organisation's published JWKS)."""
        return report.sign(resource, self._key)
