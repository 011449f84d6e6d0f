/*
 * minmilter: the cheapest milter that can still do our job. libmilter,
 * asking Postfix for the fewest protocol steps a tagging milter can work
 * with: no connect, HELO, MAIL, DATA, header, end-of-headers, body or
 * unknown-command events at all, and no reply to RCPT; it sees each
 * recipient and the end of each message, where it does what ours asks of
 * Postfix there: one header added (the tag) and the message held
 * (quarantine), so Postfix does the same work behind both. P1b measures
 * ours against it: the limit any milter in our place comes to.
 *
 *   minmilter /path/to/socket
 */
#include <libmilter/mfapi.h>
#include <stdio.h>
#include <sys/stat.h>

static sfsistat negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2,
                          unsigned long f3, unsigned long *pf0, unsigned long *pf1,
                          unsigned long *pf2, unsigned long *pf3)
{
    *pf0 = f0 & (SMFIF_ADDHDRS | SMFIF_QUARANTINE);
    *pf1 = f1 & (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NOHDRS | SMFIP_NOEOH
                 | SMFIP_NOBODY | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_NR_RCPT);
    *pf2 = 0;
    *pf3 = 0;
    return SMFIS_CONTINUE;
}

static sfsistat envrcpt(SMFICTX *ctx, char **argv) { return SMFIS_CONTINUE; }
static sfsistat eom(SMFICTX *ctx)
{
    char header[] = "X-Bench-Tag", value[] = "customer.test", reason[] = "on-demand: held";

    smfi_addheader(ctx, header, value);
    smfi_quarantine(ctx, reason);
    return SMFIS_ACCEPT;
}

int main(int argc, char **argv)
{
    struct smfiDesc desc = {
        .xxfi_name = "minmilter", .xxfi_version = SMFI_VERSION,
        .xxfi_flags = SMFIF_ADDHDRS | SMFIF_QUARANTINE,
        .xxfi_envrcpt = envrcpt, .xxfi_eom = eom, .xxfi_negotiate = negotiate,
    };
    char spec[512];

    if (argc != 2) {
        fprintf(stderr, "usage: minmilter SOCKET\n");
        return 2;
    }
    snprintf(spec, sizeof(spec), "unix:%s", argv[1]);
    umask(0);
    if (smfi_setconn(spec) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS
        || smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "minmilter: cannot listen on %s\n", argv[1]);
        return 1;
    }
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
