"""A tiny app with a custom job class, as a site would write one."""
