"""`slimlm report`: one Markdown page comparing output folders of any kind, with its plots."""
