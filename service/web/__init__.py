"""The HTTP side: handlers, middlewares, problems, sessions, the admin page."""
