"""What the trainer, the quantum pool and the control plane share, so that they depend on it and never on
each other: the JobSpec (`jobspec`), the trainer's event lines (`events`), the budget ledger (`ledger`: the
protocol and the in-process one; `sql_ledger` over `tables` and `engine`) and the admission check of a
job's forecast against its budgets (`budget`).

Kept import-light: nothing here imports FastAPI or Ray, and the modules are imported one by one.
"""
