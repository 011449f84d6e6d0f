"""ODMR (RFC 2645): customers' clients connect to us, authenticate and ask
for their held mail, and Postfix delivers it over their connection."""
