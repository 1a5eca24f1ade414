"""`erase bench`: what each method costs (`run.py`), what generation settings buy (`generation.py`), and
full-size architectures with random weights to time them on (`models.py`). Nothing else imports it."""
