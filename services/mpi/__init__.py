"""Master patient index: one enterprise id per person across the region's hospital domains."""
