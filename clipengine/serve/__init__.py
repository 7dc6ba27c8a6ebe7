"""`clipengine serve`: indexes kept open behind an HTTP API and a web page, in FastAPI's layout (`app` builds
it from `routers/`, `deps`, `models`, `errors` and `state`; `server` binds and announces it). A front door like
the CLI: it parses, calls the library and presents; the searching is `clipengine.index.search`'s, and how
other processes find a running service is `clipengine.index.service`'s."""
