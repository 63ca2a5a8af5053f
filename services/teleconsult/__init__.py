"""Remote consultations: requests, specialist schedules and signed reports."""
