"""edgeprune.storage."""
