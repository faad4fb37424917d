"""RecFlow data: schema, synthetic generator, converter, Ray Data pipeline, CascadeBatch."""
