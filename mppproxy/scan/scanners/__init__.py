"""One module per scanner engine or message check."""
