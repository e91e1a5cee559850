"""cdcca's command line (typer): a thin front door over device/ and cloud/."""
