"""rsray: remote-sensing image-text retrieval on Ray."""
