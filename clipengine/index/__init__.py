"""The index engine: a folder of images in, ranked hits out.

    scan (walk, plan from stat) -> pipeline (embed the plan, commit in groups; sharded under torchrun)
    -> store (the catalogue: manifest + meta.sqlite) -> structure (the faiss file, chosen and tuned by ann)
    -> search (query -> hits), with export/query_encoders giving queries a torch-free cold path.

It builds on the shared core (models, images, embed, pairs) and never imports the CLI, training or
evaluation.
"""
