"""Graph passes (torch.fx / torch.compile): find attention sites and rewrite them to MoBA.

No CLI or file I/O lives here: these modules take graphs and modules and return graphs,
modules and site lists.
"""
