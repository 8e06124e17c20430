"""The teachers: building the ladder's from-scratch rungs, the schedule over stages, live teachers
held one at a time, and stored top-k outputs; the training step reads either kind through one
interface (:class:`clpd.training.step.Teacher`)."""
