"""The domain: identity lifecycle, collections and keys, 1:N search, live streams and tracking."""
