"""Where Locally's webhooks enter: authentication, decoding, group commit."""
