"""The index engine: a folder of images in, ranked hits out.

    scan (walk, plan from stat) -> pipeline (embed the plan, commit in groups; sharded under torchrun)
    -> store (the catalogue: manifest + meta.sqlite; file names in location) -> faiss_view (vectors.faiss,
    chosen and tuned by ann) -> search (a Searcher: query -> hits), with export/query_encoders giving queries
    a torch-free cold path, and query/service answering a one-shot query through a running service.

It builds on the shared core (models, images, embed, pairs, durable) and never imports the CLI, the service,
training or evaluation.
"""
