"""Wire protocols, parsed and answered without I/O: finger (RFC 1288) and
Postfix's SMTPD policy delegation protocol."""
