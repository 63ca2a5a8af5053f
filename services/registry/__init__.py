"""Document registry (metadata) and repository (content)."""
