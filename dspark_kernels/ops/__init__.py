"""torch.library definitions of the dspark ops: schema, fake, validation, dispatch."""
