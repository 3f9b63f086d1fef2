"""Storage: the SQL store (SQLite or MySQL), the staging cache (memory or Redis), sealed crops."""
