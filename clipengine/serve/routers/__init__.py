"""The service's routes, one router per area: searching, files by id, what is served, and the page."""
