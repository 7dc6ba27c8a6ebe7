"""`clipengine serve`: indexes kept open behind an HTTP API and a web page (`app`), and how other processes
find a running service and ask it instead of loading the index themselves (`discovery`). A front door like
the CLI: it parses, calls the library and presents; the searching is `clipengine.index.search`'s."""
