// mtlsload: a small closed-loop HTTP/1.1 load generator that presents a TLS client
// certificate.  Go standard library only (builds with Debian golang-go 1.19, no modules).
//
// Each of -c workers owns one TLS connection, writes a pre-serialised request and parses
// the response with net/http.ReadResponse (handles Content-Length and chunked bodies).
// With -newconn every request uses a fresh TCP+TLS connection (full handshake, no session
// resumption: no ClientSessionCache is configured) and sends "Connection: close";
// -newconn -resume adds a client session cache, so reconnects resume (TLS 1.3 PSK+ECDHE).
//
//	build/mtlsload -url https://127.0.0.1:18443/ -cert pki/client-a.crt -key pki/client-a.key \
//	    -ca pki/ca.crt -token-file run/token-a-es256.txt -c 32 -d 10s [-newconn]
//
// This copy (bench/mtlsload, from shared/tools/mtlsload) adds, for bench/run.py:
//   - http:// URLs (plain TCP: the "direct to the upstream" reference path);
//   - -rate R: paced at R requests/s in total, latency measured from when a worker takes a
//     request up; ticks no worker could take (all busy, queue full) are counted as "late";
//   - -idle: each worker opens its connection, sends one request, then holds the connection
//     idle until -d ends (dials at most 64 at a time); prints "IDLE READY <n>" once all are up.
//
// Prints one human summary and one "RESULT {json}" line.  Exit status 1 when a request
// errored or returned a status other than -expect (unless -expect 0).
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

type result struct {
	n, errs   int64
	status    map[int]int64
	lat       []time.Duration
	handshake int64
	resumed   int64
	firstErr  string
}

func main() {
	rawURL := flag.String("url", "https://127.0.0.1:18443/", "target URL (https)")
	conc := flag.Int("c", 32, "concurrent connections / workers")
	dur := flag.Duration("d", 10*time.Second, "test duration")
	warm := flag.Duration("warmup", 0, "warm-up period not counted (keep-alive connections stay open)")
	maxN := flag.Int64("n", 0, "stop after this many requests in total (0 = duration only)")
	certF := flag.String("cert", "", "client certificate PEM")
	keyF := flag.String("key", "", "client key PEM (default: -cert)")
	caF := flag.String("ca", "", "CA PEM to verify the server (default: no verification)")
	tokF := flag.String("token-file", "", "file with a bearer token -> Authorization: Bearer ...")
	method := flag.String("m", "GET", "HTTP method")
	newconn := flag.Bool("newconn", false, "new TLS connection per request (full handshake each time)")
	expect := flag.Int("expect", 200, "expected status (0 = any); others count as errors for exit status")
	tls12 := flag.Bool("tls12", false, "cap at TLS 1.2 (default: negotiate, i.e. TLS 1.3)")
	resume := flag.Bool("resume", false, "with -newconn: resume TLS sessions (client session cache) instead of full handshakes")
	rate := flag.Float64("rate", 0, "open loop: this many requests/s in total (0 = closed loop, as fast as possible)")
	vary := flag.Bool("vary", false, "a different target on every request (query n=<count>), so a connection never sends the same head twice")
	idle := flag.Bool("idle", false, "open -c connections, one request each, then hold them idle until -d ends")
	var hdrs headers
	flag.Var(&hdrs, "H", "extra request header 'Name: value' (repeatable)")
	flag.Parse()

	u, err := url.Parse(*rawURL)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") {
		fatal("need an https:// or http:// URL: %v", err)
	}
	plain := u.Scheme == "http"
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), map[bool]string{true: "80", false: "443"}[plain])
	}
	cfg := &tls.Config{ServerName: u.Hostname(), NextProtos: []string{"http/1.1"}}
	if *tls12 {
		cfg.MaxVersion = tls.VersionTLS12
	}
	if *resume {
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4 * *conc)
	}
	if *certF != "" {
		if *keyF == "" {
			*keyF = *certF
		}
		c, err := tls.LoadX509KeyPair(*certF, *keyF)
		if err != nil {
			fatal("client cert: %v", err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	if *caF != "" {
		pem, err := os.ReadFile(*caF)
		if err != nil {
			fatal("ca: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			fatal("ca: no certificates in %s", *caF)
		}
		cfg.RootCAs = pool
	} else {
		cfg.InsecureSkipVerify = true
	}

	var sb strings.Builder
	path := u.RequestURI()
	fmt.Fprintf(&sb, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: mtlsload\r\n", *method, path, u.Host)
	if *tokF != "" {
		t, err := os.ReadFile(*tokF)
		if err != nil {
			fatal("token: %v", err)
		}
		fmt.Fprintf(&sb, "Authorization: Bearer %s\r\n", strings.TrimSpace(string(t)))
	}
	for _, h := range hdrs {
		fmt.Fprintf(&sb, "%s\r\n", h)
	}
	if *newconn {
		sb.WriteString("Connection: close\r\n")
	}
	sb.WriteString("\r\n")
	req := []byte(sb.String())
	// -vary: the request line gets "n=<count>" added to its query; the rest stays as is.
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	varyPre := []byte(*method + " " + path + sep + "n=")
	varyPost := req[len(*method)+1+len(path):]

	// -rate: a pacer hands out scheduled start times; a worker measures from that time.
	var ticks chan time.Time
	var late int64
	pacerStop := make(chan struct{})
	if *rate > 0 {
		ticks = make(chan time.Time, 4096)
		interval := time.Duration(float64(time.Second) / *rate)
		go func() {
			next := time.Now()
			for {
				next = next.Add(interval)
				if d := time.Until(next); d > 0 {
					time.Sleep(d)
				}
				select {
				case <-pacerStop:
					close(ticks)
					return
				case ticks <- next:
				default:
					atomic.AddInt64(&late, 1) // every worker busy and the queue full
				}
			}
		}()
	}
	dialSem := make(chan struct{}, 64)
	var established int64
	idleReady := make(chan struct{})
	dial := func() (net.Conn, bool, error) {
		d := &net.Dialer{Timeout: 5 * time.Second}
		if plain {
			c, err := d.Dial("tcp", host)
			return c, false, err
		}
		c, err := tls.DialWithDialer(d, "tcp", host, cfg)
		if err != nil {
			return nil, false, err
		}
		return c, c.ConnectionState().DidResume, nil
	}

	var stop, counting int32
	var issued int64
	if *warm == 0 {
		counting = 1
	}
	results := make([]*result, *conc)
	var wg sync.WaitGroup
	var start time.Time
	startCh := make(chan struct{})
	for i := 0; i < *conc; i++ {
		r := &result{status: map[int]int64{}, lat: make([]time.Duration, 0, 1<<16)}
		results[i] = r
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-startCh
			var conn net.Conn
			var br *bufio.Reader
			out, buf, sent := req, []byte(nil), 0
			fail := func(e error) {
				if atomic.LoadInt32(&counting) == 1 {
					r.errs++
					if r.firstErr == "" {
						r.firstErr = e.Error()
					}
				}
				if conn != nil {
					conn.Close()
					conn = nil
				}
			}
			for atomic.LoadInt32(&stop) == 0 {
				if *maxN > 0 && atomic.AddInt64(&issued, 1) > *maxN {
					break
				}
				t0 := time.Now()
				if ticks != nil {
					if _, ok := <-ticks; !ok {
						break
					}
					// Measured from when a worker picks the request up: the pacer's own sleep
					// jitter stays out; at -rate well under capacity no request waits for a
					// worker (the "late" count says if any could not be started on time).
					t0 = time.Now()
				}
				if conn == nil {
					if *idle {
						dialSem <- struct{}{}
					}
					c, didResume, err := dial()
					if *idle {
						<-dialSem
					}
					if err != nil {
						fail(err)
						time.Sleep(10 * time.Millisecond)
						continue
					}
					conn, br = c, bufio.NewReaderSize(c, 16<<10)
					if !plain {
						r.handshake++
					}
					if didResume {
						r.resumed++
					}
				}
				if *vary {
					sent++
					buf = append(strconv.AppendInt(append(buf[:0], varyPre...), int64(sent), 10), varyPost...)
					out = buf
				}
				if _, err := conn.Write(out); err != nil {
					fail(err)
					continue
				}
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					fail(err)
					continue
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil {
					fail(err)
					continue
				}
				if atomic.LoadInt32(&counting) == 1 {
					r.lat = append(r.lat, time.Since(t0))
					r.n++
					r.status[resp.StatusCode]++
				}
				if *newconn || resp.Close {
					conn.Close()
					conn = nil
				}
				if *idle && conn != nil {
					if atomic.AddInt64(&established, 1) == int64(*conc) {
						close(idleReady)
					}
					for atomic.LoadInt32(&stop) == 0 {
						time.Sleep(100 * time.Millisecond)
					}
				}
			}
			if conn != nil {
				conn.Close()
			}
		}()
	}
	close(startCh)
	if *idle {
		go func() {
			<-idleReady
			fmt.Printf("IDLE READY %d\n", *conc)
			os.Stdout.Sync()
		}()
	}
	if *warm > 0 {
		time.Sleep(*warm)
		atomic.StoreInt32(&counting, 1)
	}
	start = time.Now()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-time.After(*dur):
	case <-done:
	}
	atomic.StoreInt32(&stop, 1)
	elapsed := time.Since(start)
	if ticks != nil {
		close(pacerStop)
	}
	<-done

	var n, errs, hs, resumed int64
	status := map[int]int64{}
	var lat []time.Duration
	firstErr := ""
	for _, r := range results {
		n += r.n
		errs += r.errs
		hs += r.handshake
		resumed += r.resumed
		for k, v := range r.status {
			status[k] += v
		}
		lat = append(lat, r.lat...)
		if firstErr == "" {
			firstErr = r.firstErr
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		i := int(p * float64(len(lat)-1))
		return float64(lat[i].Microseconds()) / 1000
	}
	rps := float64(n) / elapsed.Seconds()
	bad := errs
	for k, v := range status {
		if *expect != 0 && k != *expect {
			bad += v
		}
	}
	mode := "keepalive"
	if *newconn {
		mode = "newconn"
		if *resume {
			mode = "resume"
		}
	}
	if *idle {
		mode = "idle"
	} else if *rate > 0 {
		mode = "rate"
	}
	fmt.Printf("mtlsload %s c=%d GOMAXPROCS=%d: %d requests in %.2fs = %.0f req/s, handshakes %d (resumed %d), errors %d, status %v\n",
		mode, *conc, runtime.GOMAXPROCS(0), n, elapsed.Seconds(), rps, hs, resumed, errs, status)
	fmt.Printf("latency ms: p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", pct(.5), pct(.9), pct(.99), pct(1))
	if firstErr != "" {
		fmt.Printf("first error: %s\n", firstErr)
	}
	st := map[string]int64{}
	for k, v := range status {
		st[fmt.Sprint(k)] = v
	}
	js, _ := json.Marshal(map[string]interface{}{"tool": "mtlsload", "mode": mode, "c": *conc, "requests": n,
		"seconds": elapsed.Seconds(), "rps": rps, "errors": errs, "status": st, "handshakes": hs, "resumed": resumed,
		"p50_ms": pct(.5), "p90_ms": pct(.9), "p99_ms": pct(.99), "late": late, "target_rps": *rate})
	fmt.Printf("RESULT %s\n", js)
	if bad > 0 {
		os.Exit(1)
	}
}

func fatal(f string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "mtlsload: "+f+"\n", a...)
	os.Exit(2)
}
