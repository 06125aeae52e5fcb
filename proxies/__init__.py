"""Protocol proxies: one subpackage per protocol (see sniff.registry for the plugin contract)."""
