"""The memory engine that every model kind goes through.

Language models (:mod:`vramplan.blocks`) and image models (:mod:`vramplan.vision`) are recipes: they
record their forward programs with the ops here and hand them to the one replay; the numerics, the
attention-kernel choice and the constants of a step live here once.

* :mod:`.numerics` — dtypes of a run (:class:`Numerics`) and the attention kernel
  ``scaled_dot_product_attention`` picks (:func:`sdpa_kernel`);
* :mod:`.step` — what a step adds around the replayed programs (CUDA context, cuBLAS workspaces,
  allocator slack) and the :class:`~vramplan.result.Estimate` built from the phases;
* :mod:`.loop` — the order of a training step's phases (micro-batches, optimizer step, ``zero_grad``) over the
  allocation streams of both model kinds (:func:`training_steps`).
"""
