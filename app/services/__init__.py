"""Business rules. Services take a Session and never commit: the request or task boundary does."""
