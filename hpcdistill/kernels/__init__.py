"""hpcdistill.kernels: the Triton kernels and the torch formulas they are checked against
(issue 10; design in docs/gpu-kernels.md), below the models that score and the losses that train.

    common      the optional triton import and the shared prologue of both kernels: the online
                logsumexp / entropy / KL update of one side over one vocabulary block
    reference   log_softmax, KL, entropy on log-probabilities in float32 (the torch path)
    scoring     one-pass fused scoring of student and teacher logits (`score_logits`)
    loss        fused linear + distillation loss without a [N, V] logits tensor

Layer 2: imports only torch, triton and the package's ground floor, so `models/` and `distill/`
can both use it.
"""
