"""The gateway: the client-facing API, session records (Redis or in process), routing to draft
services, resumption after a lost node, and the request's trace."""
