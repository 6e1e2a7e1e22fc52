"""Domain mixing policies (data-policy layer): online samplers that implement
``sigma_moe.train.sampling.Sampler``, the run assembly that picks one from
``data.mixing.kind``, and the RegMix pilot search. ``train/`` never imports this package."""
