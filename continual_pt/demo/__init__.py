"""`cpt demo`: the paper's experiment at laptop scale, end to end, with a verdict per finding."""
