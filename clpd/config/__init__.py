"""Typed configuration: :mod:`~clpd.config.enums` (the allowed values of choice fields),
:mod:`~clpd.config.model` (student and teacher schemas), :mod:`~clpd.config.schema` (the train and
eval schemas, registered in Hydra's ConfigStore, and :func:`~clpd.config.schema.to_object`), and
:mod:`~clpd.config.package_paths` (``pkg:`` model paths)."""
