"""On top of fit results and stores: report (tables beside the paper's, plots), tables (the rich
tables the CLI prints), attention (where the pooling looks), correspond (semantic
correspondence, the paper's Eq. 1)."""
