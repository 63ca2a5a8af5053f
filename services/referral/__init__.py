"""Referrals between member hospitals, tracked as a closed loop."""
