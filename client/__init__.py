"""edgeprune.client."""
