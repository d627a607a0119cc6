from tokensvc.cli import app

app(prog_name="tokensvc")
