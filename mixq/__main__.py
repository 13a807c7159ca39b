"""`python -m mixq …` (and `torchrun … -m mixq …`): the command line."""
from .cli import app

app()
