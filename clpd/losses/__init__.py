"""Token-level training losses as pure functions of logits and targets.

Targets are already shifted (``targets[:, t]`` is the token after position t) and hold -100 where
no loss is taken (prompt and padding). Each function returns the *sum* over answer tokens: the
training loop divides by the answer tokens of the whole accumulated batch, so every answer token
weighs the same however the batch was split into micro-batches.

Three layers:

* ``DIVERGENCES``: per-token divergences, pure functions of fp32 log-probabilities
  ``(s_logp, t_logp)`` of shape ``[N, V]`` (s = student, t = teacher) returning ``[N]``.
* ``kd_loss_sum``: logits in, summed divergence out; aligns vocabularies, keeps only answer
  positions, and works through them in chunks (checkpointed when large, or for ``forward_kl`` with
  its gradient written out) so memory stays bounded for a 152k-row vocabulary.
* ``distill_loss``: what the loop calls; ``alpha * CE + (1 - alpha) * KD``, or plain CE for
  ``"sft"``, returned with its two terms apart (:class:`LossTerms`) so that both can be logged.

Stored (top-k) teachers. A teacher's outputs can be stored sparsely as :class:`TopK` (built by
``top_k_outputs``): per answer row, its k largest logits over the ``width`` compared vocabulary rows
and ``tail_lse``, the logsumexp of the other ``width - k``. ``sparse_kd_loss_sum`` (and
``distill_loss`` given a ``TopK``) then computes each divergence between the (k+1)-bucket
coarsenings of the two distributions: the teacher's k rows, and one tail bucket holding everything
else; the student's side is exact (a softmax over all ``width`` rows, summed into the buckets).
What is exact: with k == width there is no tail bucket and every divergence, and its gradient,
equals the dense one (up to summation order); at T = 1 with k < width the result is the exact
divergence between the two coarsenings, which by the data-processing inequality is <= the full
divergence (every divergence here is an f-divergence, so coarsening can only lose information).
What is approximate: the tail bucket hides how the mass inside it is spread, so the loss neither
sees nor pushes on the student's distribution within the tail, only its total; and at T != 1 the
teacher's tempered tail is not recoverable from ``tail_lse``, so it is taken as that of a flat tail
with the same T = 1 mass (see ``tempered_tail_lse``).

Adding a divergence is one function and one entry in ``DIVERGENCES``: ``distill.loss`` takes its
allowed values from ``LOSS_NAMES`` (clpd/config/enums.py lists the same names; a test keeps them equal). A divergence takes
``(s_logp, t_logp, **knobs)``: the knobs are ``beta`` and ``lam`` (``distill.beta``,
``distill.skew_lambda``); each function names the one it uses and ignores the others.

Modules: :mod:`~clpd.losses.divergences` (the per-token divergences), :mod:`~clpd.losses.chunks`
(cross-entropy, answer rows, the chunk runner and argument checks), :mod:`~clpd.losses.dense`
(``kd_loss_sum``), :mod:`~clpd.losses.sparse` (``TopK``, ``sparse_kd_loss_sum``) and
:mod:`~clpd.losses.distill` (``distill_loss``, :class:`LossTerms`).
"""
