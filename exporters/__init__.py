"""Exporters: where usage, meter events and invoices go downstream."""
