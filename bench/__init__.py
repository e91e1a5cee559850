"""`cdcca bench`: every number in the report is measured in the same run, on data the project
generates, with its baseline beside it.  One module per report section; ``run.run_bench`` drives
them and ``report`` turns the results (the same objects that go to ``results.json``) into Markdown.
"""
