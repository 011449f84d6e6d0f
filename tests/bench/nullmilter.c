/*
 * nullmilter: the least a milter can be. libmilter, the same protocol
 * steps skipped as ours (connect, HELO, DATA, end of headers; no replies to
 * headers and body), every message accepted unchanged. P1 measures it
 * beside ours: what any milter costs Postfix on this machine.
 *
 *   nullmilter /path/to/socket
 */
#include <libmilter/mfapi.h>
#include <stdio.h>
#include <sys/stat.h>

static sfsistat negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2,
                          unsigned long f3, unsigned long *pf0, unsigned long *pf1,
                          unsigned long *pf2, unsigned long *pf3)
{
    *pf0 = 0;
    *pf1 = f1 & (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOEOH | SMFIP_NOUNKNOWN
                 | SMFIP_NODATA | SMFIP_NR_HDR | SMFIP_NR_BODY);
    *pf2 = 0;
    *pf3 = 0;
    return SMFIS_CONTINUE;
}

static sfsistat envfrom(SMFICTX *ctx, char **argv) { return SMFIS_CONTINUE; }
static sfsistat envrcpt(SMFICTX *ctx, char **argv) { return SMFIS_CONTINUE; }
static sfsistat header(SMFICTX *ctx, char *name, char *value) { return SMFIS_CONTINUE; }
static sfsistat body(SMFICTX *ctx, unsigned char *chunk, size_t len) { return SMFIS_CONTINUE; }
static sfsistat eom(SMFICTX *ctx) { return SMFIS_ACCEPT; }

int main(int argc, char **argv)
{
    struct smfiDesc desc = {
        .xxfi_name = "nullmilter", .xxfi_version = SMFI_VERSION, .xxfi_flags = 0,
        .xxfi_envfrom = envfrom, .xxfi_envrcpt = envrcpt, .xxfi_header = header,
        .xxfi_body = body, .xxfi_eom = eom, .xxfi_negotiate = negotiate,
    };
    char spec[512];

    if (argc != 2) {
        fprintf(stderr, "usage: nullmilter SOCKET\n");
        return 2;
    }
    snprintf(spec, sizeof(spec), "unix:%s", argv[1]);
    umask(0);
    if (smfi_setconn(spec) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS
        || smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "nullmilter: cannot listen on %s\n", argv[1]);
        return 1;
    }
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
