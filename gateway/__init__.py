"""The exchange's only public door: OAuth2 (SMART Backend Services) and HTTP/JSON over gRPC."""
