def decoder_args_from_config(cfg, in_channels: int, mask_classification: bool) -> dict:
    """Constructor arguments both transformer decoders read the same way from the config."""
    mf = cfg.MODEL.MASK_FORMER
    return {
        "in_channels": in_channels,
        "mask_classification": mask_classification,
        "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        "hidden_dim": mf.HIDDEN_DIM,
        "num_queries": mf.NUM_OBJECT_QUERIES,
        "nheads": mf.NHEADS,
        "dim_feedforward": mf.DIM_FEEDFORWARD,
        "pre_norm": mf.PRE_NORM,
        "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
        "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
    }
