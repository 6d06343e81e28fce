"""Billing on top of usage: invoices, the prepaid wallet, cost and margin, and the events they
(and the meters) hand to the exporters' outbox."""
