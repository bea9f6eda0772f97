"""Selective scan (Mamba-1): the diagonal, input-dependent linear recurrence of
mamba_ssm's ``selective_scan_ref``, batch-major. Entry point: `ops.selective_scan`."""
