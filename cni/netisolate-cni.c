/*
 * netisolate-cni: the chained CNI plugin of netisolate.
 *
 *   cc -O2 -static -o netisolate-cni cni/netisolate-cni.c
 *
 * The container runtime runs it on the host, as the last plugin of the node's CNI chain, once the
 * primary CNI has set up the pod's network namespace and before any container of the pod starts.
 * It hands the request to the netisolate agent on this node over a Unix socket, with the pod's
 * network namespace as an open file descriptor (SCM_RIGHTS), and relays the answer. The agent
 * installs the pod's rules into that namespace and answers only once they hold, so no container
 * of an isolated pod ever runs unguarded.
 *
 * Hosts may have no Python (Bottlerocket, COS, Talos): this is one static C file, libc only.
 * It speaks CNI spec 0.3.x, 0.4.0 and 1.0.0:
 *   ADD     passes prevResult through unchanged once the agent says yes;
 *   DEL     always succeeds (the agent is told when it can be reached);
 *   CHECK   asks the agent whether the rules still hold;
 *   VERSION answers without the agent.
 * Pods in the namespaces listed in "exemptNamespaces" always pass without asking the agent (the
 * agent itself, the webhook and the CNI must start on a fresh node), and so do sandboxes that are
 * not Kubernetes pods (no K8S_POD_NAMESPACE in CNI_ARGS). Every other ADD fails when the agent
 * cannot be reached (fail closed): the runtime then retries the sandbox instead of starting it.
 *
 * The wire format (request, then reply; the agent's parser is netisolate/cni/protocol.py):
 *   request:  "netisolate-cni/1\n", then fields "<name> <length>\n<bytes>\n", then "end 0\n\n";
 *             the namespace's fd rides on the first bytes. Names: command, containerid, netns,
 *             ifname, args, config.
 *   reply:    "ok\n" or "fail\n<CNI error JSON>".
 *
 * Plugin configuration (the agent writes it into the conflist):
 *   {"type": "netisolate-cni", "socket": "/var/run/netisolate/cni.sock",
 *    "exemptNamespaces": ["kube-system", "netisolate-system"], "timeoutSeconds": 30}
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define PROTOCOL "netisolate-cni/1\n"
#define DEFAULT_SOCKET "/var/run/netisolate/cni.sock"
#define DEFAULT_TIMEOUT_S 30
#define DEL_TIMEOUT_S 5 /* DEL never fails, so it never waits long either */
#define MAX_STDIN (1 << 20)
#define MAX_REPLY (64 << 10)
#define MAX_EXEMPT 64
#define MAX_NAME 256
#define MAX_DEPTH 64

/* Well-known CNI error codes (spec 1.0.0, "Error"). */
enum { E_VERSION = 1, E_ENV = 4, E_IO = 5, E_DECODE = 6, E_CONFIG = 7, E_TRY_AGAIN = 11 };

static const char *const SUPPORTED[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", NULL};

struct span {
    const char *p;
    size_t n;
};

struct config {
    char version[32];
    char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
    char exempt[MAX_EXEMPT][MAX_NAME];
    int n_exempt;
    struct span prev_result;
    long timeout_s;
};

/* The version errors are reported in: the config's, once it is known and supported. */
static const char *error_version = "1.0.0";

/* --- output ------------------------------------------------------------------------------------ */

static void put_json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c == '\n')
            fputs("\\n", stdout);
        else if (c < 0x20 || c == 0x7f)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

/* Print a CNI error object on stdout (where the runtime reads it) and exit non-zero. */
static void fail(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void fail(int code, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fputs("{\"cniVersion\": ", stdout);
    put_json_string(error_version);
    printf(", \"code\": %d, \"msg\": ", code);
    put_json_string(msg);
    fputs("}\n", stdout);
    fflush(stdout);
    fprintf(stderr, "%s\n", msg); /* the runtime logs it */
    exit(1);
}

/* --- a small JSON reader: validates the whole document, extracts the few fields we use --------- */

struct scan {
    const char *p, *end;
    int depth;
};

static void ws(struct scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int expect(struct scan *s, char c)
{
    ws(s);
    if (s->p >= s->end || *s->p != c)
        return -1;
    s->p++;
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = (char)tolower((unsigned char)c);
    return (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
}

/* Read a string at s->p. With out != NULL it is decoded into out (cap bytes, NUL-terminated);
 * a string that does not fit, or holds \u escapes beyond ASCII or NUL, is then an error: the
 * values we decode (versions, paths, namespace names) are plain ASCII. */
static int string(struct scan *s, char *out, size_t cap)
{
    size_t n = 0;
    ws(s);
    if (s->p >= s->end || *s->p != '"')
        return -1;
    s->p++;
    while (s->p < s->end) {
        unsigned char c = (unsigned char)*s->p++;
        if (c == '"') {
            if (out)
                out[n] = '\0';
            return 0;
        }
        if (c < 0x20)
            return -1;
        if (c == '\\') {
            if (s->p >= s->end)
                return -1;
            c = (unsigned char)*s->p++;
            if (c == 'u') {
                int v = 0;
                for (int i = 0; i < 4; i++) {
                    int h = s->p < s->end ? hexval(*s->p) : -1;
                    if (h < 0)
                        return -1;
                    v = v * 16 + h;
                    s->p++;
                }
                if (out && (v == 0 || v > 0x7f))
                    return -1;
                c = (unsigned char)v;
            } else {
                const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
                const char *at = c ? strchr(from, c) : NULL;
                if (!at)
                    return -1;
                c = (unsigned char)to[at - from];
            }
        }
        if (out) {
            if (n + 1 >= cap)
                return -1;
            out[n++] = (char)c;
        }
    }
    return -1;
}

static int value(struct scan *s);

static int members(struct scan *s, char open, char close)
{
    if (++s->depth > MAX_DEPTH)
        return -1;
    if (expect(s, open) < 0)
        return -1;
    ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        s->depth--;
        return 0;
    }
    for (;;) {
        if (open == '{' && (string(s, NULL, 0) < 0 || expect(s, ':') < 0))
            return -1;
        if (value(s) < 0)
            return -1;
        ws(s);
        if (s->p >= s->end)
            return -1;
        if (*s->p == close) {
            s->p++;
            s->depth--;
            return 0;
        }
        if (*s->p++ != ',')
            return -1;
    }
}

static int literal(struct scan *s, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
        return -1;
    s->p += n;
    return 0;
}

static int number(struct scan *s)
{
    const char *start = s->p;
    if (s->p < s->end && *s->p == '-')
        s->p++;
    if (s->p >= s->end || !isdigit((unsigned char)*s->p))
        return -1;
    if (*s->p == '0')
        s->p++;
    else
        while (s->p < s->end && isdigit((unsigned char)*s->p))
            s->p++;
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (s->p >= s->end || !isdigit((unsigned char)*s->p))
            return -1;
        while (s->p < s->end && isdigit((unsigned char)*s->p))
            s->p++;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (s->p >= s->end || !isdigit((unsigned char)*s->p))
            return -1;
        while (s->p < s->end && isdigit((unsigned char)*s->p))
            s->p++;
    }
    return s->p > start ? 0 : -1;
}

static int value(struct scan *s)
{
    ws(s);
    if (s->p >= s->end)
        return -1;
    switch (*s->p) {
    case '{':
        return members(s, '{', '}');
    case '[':
        return members(s, '[', ']');
    case '"':
        return string(s, NULL, 0);
    case 't':
        return literal(s, "true");
    case 'f':
        return literal(s, "false");
    case 'n':
        return literal(s, "null");
    default:
        return number(s);
    }
}

static int string_array(struct scan *s, struct config *c)
{
    if (expect(s, '[') < 0)
        return -1;
    ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        return 0;
    }
    for (;;) {
        if (c->n_exempt >= MAX_EXEMPT || string(s, c->exempt[c->n_exempt], MAX_NAME) < 0)
            return -1;
        c->n_exempt++;
        ws(s);
        if (s->p >= s->end)
            return -1;
        if (*s->p == ']') {
            s->p++;
            return 0;
        }
        if (*s->p++ != ',')
            return -1;
    }
}

/* The fields we use, from the top-level object; everything else is validated and skipped. A
 * field we use given twice is an error: the agent reads the same document, and two readers
 * must never disagree about which value counts. */
static const char *parse_config(const char *text, size_t len, struct config *c)
{
    struct scan s = {text, text + len, 1};
    int seen_version = 0, seen_socket = 0, seen_exempt = 0, seen_prev = 0, seen_timeout = 0;
    char key[64];

    memset(c, 0, sizeof *c);
    strcpy(c->socket, DEFAULT_SOCKET);
    c->timeout_s = DEFAULT_TIMEOUT_S;
    if (expect(&s, '{') < 0)
        return "the network configuration on stdin is not a JSON object";
    ws(&s);
    if (s.p < s.end && *s.p == '}')
        s.p++;
    else
        for (;;) {
            struct scan key_at = s;
            if (string(&s, key, sizeof key) < 0) {
                s = key_at; /* a long or exotic key is none of ours: skip it */
                if (string(&s, NULL, 0) < 0)
                    return "the network configuration on stdin is not valid JSON";
                key[0] = '\0';
            }
            if (expect(&s, ':') < 0)
                return "the network configuration on stdin is not valid JSON";
            ws(&s);
            int bad = 0;
            if (strcmp(key, "cniVersion") == 0)
                bad = seen_version++ || string(&s, c->version, sizeof c->version) < 0;
            else if (strcmp(key, "socket") == 0)
                bad = seen_socket++ || string(&s, c->socket, sizeof c->socket) < 0;
            else if (strcmp(key, "exemptNamespaces") == 0)
                bad = seen_exempt++ || string_array(&s, c) < 0;
            else if (strcmp(key, "timeoutSeconds") == 0) {
                const char *start = s.p;
                char *stop;
                bad = seen_timeout++ || number(&s) < 0;
                c->timeout_s = strtol(start, &stop, 10);
                bad = bad || stop != s.p || c->timeout_s < 1 || c->timeout_s > 600;
            } else if (strcmp(key, "prevResult") == 0) {
                const char *start = s.p;
                bad = seen_prev++ || s.p >= s.end || *s.p != '{' || value(&s) < 0;
                c->prev_result.p = start;
                c->prev_result.n = (size_t)(s.p - start);
            } else
                bad = value(&s) < 0;
            if (bad)
                return "the network configuration on stdin is malformed: \"cniVersion\" and \"socket\" "
                       "must be strings, \"exemptNamespaces\" a list of names, \"timeoutSeconds\" "
                       "1-600, \"prevResult\" an object, each at most once";
            ws(&s);
            if (s.p < s.end && *s.p == ',') {
                s.p++;
                continue;
            }
            if (expect(&s, '}') < 0)
                return "the network configuration on stdin is not valid JSON";
            break;
        }
    ws(&s);
    if (s.p != s.end)
        return "the network configuration on stdin has data after its JSON object";
    return NULL;
}

/* --- the request -------------------------------------------------------------------------------- */

struct buffer {
    char *p;
    size_t n, cap;
};

static void append(struct buffer *b, const void *data, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = (b->n + n) * 2;
        char *p = realloc(b->p, cap);
        if (!p)
            fail(E_IO, "netisolate-cni: out of memory");
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}

static void field(struct buffer *b, const char *name, const char *data, size_t n)
{
    char head[128];
    int len = snprintf(head, sizeof head, "%s %zu\n", name, n);
    append(b, head, (size_t)len);
    append(b, data, n);
    append(b, "\n", 1);
}

static const char *env(const char *name)
{
    const char *v = getenv(name);
    return v ? v : "";
}

/* One value of CNI_ARGS ("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;..."): how often the key is
 * given (the value is that of the first), so that a key given twice can be refused. */
static int cni_arg(const char *args, const char *key, char *out, size_t cap)
{
    size_t klen = strlen(key);
    int count = 0;
    out[0] = '\0';
    for (const char *p = args; *p;) {
        const char *end = strchr(p, ';');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n > klen && memcmp(p, key, klen) == 0 && p[klen] == '=' && count++ == 0) {
            size_t v = n - klen - 1;
            if (v >= cap)
                v = cap - 1;
            memcpy(out, p + klen + 1, v);
            out[v] = '\0';
        }
        p += n + (end ? 1 : 0);
    }
    return count;
}

static int send_all(int fd, const char *p, size_t n, int netns_fd)
{
    while (n > 0) {
        struct iovec iov = {(void *)p, n};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        char control[CMSG_SPACE(sizeof(int))];
        if (netns_fd >= 0) { /* the namespace rides on the first bytes */
            memset(control, 0, sizeof control);
            msg.msg_control = control;
            msg.msg_controllen = sizeof control;
            struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cm), &netns_fd, sizeof(int));
        }
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        netns_fd = -1;
        p += sent;
        n -= (size_t)sent;
    }
    return 0;
}

/* Ask the agent. Returns NULL and fills reply on an answer, else what went wrong. */
static const char *ask_agent(const struct config *c, const struct buffer *request, int netns_fd,
                             long timeout_s, struct buffer *reply)
{
    static char why[512];
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct timeval tv = {.tv_sec = timeout_s};
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return "cannot create a Unix socket";
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* connect() honours it too */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    memcpy(addr.sun_path, c->socket, strlen(c->socket));
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        snprintf(why, sizeof why, "cannot connect to the agent's socket %s (%s)", c->socket, strerror(errno));
        close(fd);
        return why;
    }
    if (send_all(fd, request->p, request->n, netns_fd) < 0 || shutdown(fd, SHUT_WR) < 0) {
        snprintf(why, sizeof why, "cannot send the request to the agent at %s (%s)", c->socket, strerror(errno));
        close(fd);
        return why;
    }
    for (;;) {
        char chunk[4096];
        ssize_t got = read(fd, chunk, sizeof chunk);
        if (got == 0)
            break;
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            snprintf(why, sizeof why, "no answer from the agent at %s within %lds (%s)", c->socket, timeout_s,
                     strerror(errno));
            close(fd);
            return why;
        }
        if (reply->n + (size_t)got > MAX_REPLY) {
            close(fd);
            return "the agent's answer is too long";
        }
        append(reply, chunk, (size_t)got);
    }
    close(fd);
    return NULL;
}

/* --- main --------------------------------------------------------------------------------------- */

static int supported(const char *version)
{
    for (int i = 0; SUPPORTED[i]; i++)
        if (strcmp(version, SUPPORTED[i]) == 0)
            return 1;
    return 0;
}

static void print_result(const struct config *c)
{
    if (c->prev_result.p) { /* a chained plugin hands on what the chain produced, unchanged */
        fwrite(c->prev_result.p, 1, c->prev_result.n, stdout);
        putchar('\n');
    } else { /* first in a chain (misconfigured, but valid): an empty result */
        fputs("{\"cniVersion\": ", stdout);
        put_json_string(c->version);
        fputs("}\n", stdout);
    }
}

static char *read_stdin(size_t *len)
{
    struct buffer b = {0};
    char chunk[65536];
    for (;;) {
        ssize_t got = read(0, chunk, sizeof chunk);
        if (got == 0)
            break;
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            fail(E_IO, "cannot read the network configuration on stdin: %s", strerror(errno));
        if (b.n + (size_t)got > MAX_STDIN)
            fail(E_DECODE, "the network configuration on stdin is larger than %d bytes", MAX_STDIN);
        append(&b, chunk, (size_t)got);
    }
    append(&b, "", 1);
    *len = b.n - 1;
    return b.p;
}

int main(void)
{
    const char *command = env("CNI_COMMAND");
    struct config c;
    size_t len;
    char *stdin_text;
    const char *problem;

    if (strcmp(command, "VERSION") == 0) {
        fputs("{\"cniVersion\": \"1.0.0\", \"supportedVersions\": [", stdout);
        for (int i = 0; SUPPORTED[i]; i++)
            printf("%s\"%s\"", i ? ", " : "", SUPPORTED[i]);
        fputs("]}\n", stdout);
        return 0;
    }
    int is_add = strcmp(command, "ADD") == 0, is_del = strcmp(command, "DEL") == 0;
    int is_check = strcmp(command, "CHECK") == 0;
    if (!is_add && !is_del && !is_check)
        fail(E_ENV, "netisolate-cni: CNI_COMMAND %s is not one of ADD, DEL, CHECK, VERSION",
             command[0] ? command : "(unset)");

    stdin_text = read_stdin(&len);
    problem = parse_config(stdin_text, len, &c);
    if (problem) {
        if (is_del) /* DEL never fails: a runtime must always be able to tear a sandbox down */
            return 0;
        fail(E_DECODE, "netisolate-cni: %s; fix the netisolate-cni entry of the node's conflist, or restart "
                       "the netisolate agent so that it rewrites it", problem);
    }
    if (supported(c.version))
        error_version = c.version;
    else if (!is_del)
        fail(E_VERSION, "netisolate-cni: CNI version \"%s\" is not supported (supported: 0.3.0, 0.3.1, 0.4.0, "
                        "1.0.0); set the conflist's cniVersion to one of them", c.version);

    const char *args = env("CNI_ARGS");
    char ns[MAX_NAME], name[MAX_NAME];
    int has_ns = cni_arg(args, "K8S_POD_NAMESPACE", ns, sizeof ns);
    if ((has_ns > 1 || cni_arg(args, "K8S_POD_NAME", name, sizeof name) > 1) && !is_del)
        fail(E_ENV, "netisolate-cni: CNI_ARGS names the pod's namespace or name twice (%s); the runtime's "
                    "arguments cannot be trusted", args);
    int exempt = has_ns == 0; /* not a Kubernetes pod: nothing the agent could isolate */
    for (int i = 0; i < c.n_exempt && !exempt; i++)
        exempt = strcmp(ns, c.exempt[i]) == 0;
    if (exempt) {
        if (is_add)
            print_result(&c);
        return 0;
    }

    const char *netns = env("CNI_NETNS");
    int netns_fd = netns[0] ? open(netns, O_RDONLY | O_CLOEXEC) : -1;
    if (netns_fd < 0 && !is_del)
        fail(E_ENV, "netisolate-cni: cannot open the network namespace CNI_NETNS=\"%s\" of pod %s/%s (%s); "
                    "the runtime must pass the sandbox's namespace", netns, ns, name,
             netns[0] ? strerror(errno) : "unset");
    struct buffer request = {0}, reply = {0};
    append(&request, PROTOCOL, strlen(PROTOCOL));
    field(&request, "command", command, strlen(command));
    field(&request, "containerid", env("CNI_CONTAINERID"), strlen(env("CNI_CONTAINERID")));
    field(&request, "netns", netns, strlen(netns));
    field(&request, "ifname", env("CNI_IFNAME"), strlen(env("CNI_IFNAME")));
    field(&request, "args", args, strlen(args));
    field(&request, "config", stdin_text, len);
    append(&request, "end 0\n\n", 7);

    problem = ask_agent(&c, &request, netns_fd, is_del ? DEL_TIMEOUT_S : c.timeout_s, &reply);
    if (is_del) /* told or not, the sandbox goes: the agent forgets namespaces that are gone itself */
        return 0;
    if (problem)
        fail(E_TRY_AGAIN, "netisolate: pod %s/%s may be isolated and cannot be checked: %s. Its sandbox is not "
                          "started, so that no container runs unguarded; the runtime retries it. Start the "
                          "netisolate agent on this node (kubectl -n netisolate-system get pods -o wide), or "
                          "uninstall netisolate's CNI plugin (README, Uninstall)", ns, name, problem);
    append(&reply, "", 1);
    if (strncmp(reply.p, "ok\n", 3) == 0 && reply.n == 4) {
        if (is_add)
            print_result(&c);
        return 0;
    }
    if (strncmp(reply.p, "fail\n", 5) == 0 && reply.n > 6) {
        fputs(reply.p + 5, stdout); /* a CNI error object, written by the agent */
        return 1;
    }
    fail(E_IO, "netisolate: pod %s/%s: the agent at %s answered something this plugin does not understand; "
               "the plugin and the agent must come from the same release (restart the agent: it installs its "
               "own plugin)", ns, name, c.socket);
}
