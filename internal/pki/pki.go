// Package pki makes and loads the certificates that ferry's processes use
// to authenticate each other over mutual TLS 1.3: one private CA per
// installation, and one certificate per identity. Every certificate names
// a role and a name in a URI SAN (ferry://site/east, ferry://vault/vault,
// ferry://operator/alice, ferry://monitor/prometheus); a CA signature
// only says "part of this installation", the identity says what the holder
// may do (docs/security.md).
package pki

import (
	"cmp"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ferry-dr/ferry/internal/api"
	"github.com/ferry-dr/ferry/internal/atomicfile"
)

// File names inside a PKI directory.
const (
	CACert = "ca.crt"
	CAKey  = "ca.key"
)

// ErrNoCA: the directory has no CA yet.
var ErrNoCA = errors.New("pki: no CA (run 'ferry ca init')")

// InitCA creates a new CA in dir (ca.crt, ca.key, mode 0600). It refuses to
// overwrite an existing one.
func InitCA(dir, name string, now time.Time) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create pki dir: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, CAKey)); err == nil {
		return fmt.Errorf("pki: a CA already exists in %s", dir)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"ferry"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("create CA certificate: %w", err)
	}
	return writePair(dir, "ca", der, key)
}

// Roles a certificate can hold.
const (
	RoleVault    = "vault"    // the control plane: drives every site agent
	RoleSite     = "site"     // a site agent: serves its API, streams to peers
	RoleOperator = "operator" // a person or tool calling agents directly
	RoleMonitor  = "monitor"  // reads status and metrics only
)

// URIScheme is the scheme of the identity URI SAN.
const URIScheme = "ferry"

// Errors about identities.
var (
	// ErrNoIdentity: the certificate names no ferry identity (issued
	// before identities existed: reissue it with 'ferry ca issue --role').
	ErrNoIdentity = errors.New("pki: certificate names no ferry identity")
	// ErrWrongPeer: the peer's identity is not the one expected.
	ErrWrongPeer = errors.New("pki: unexpected peer identity")
)

// Peer is an identity: a role and a name.
type Peer struct {
	Role string
	Name string
}

func (p Peer) String() string { return p.Role + "/" + p.Name }

// URI is the identity's URI SAN, ferry://ROLE/NAME.
func (p Peer) URI() *url.URL { return &url.URL{Scheme: URIScheme, Host: p.Role, Path: "/" + p.Name} }

// CheckRole refuses a role ferry does not know.
func CheckRole(role string) error {
	switch role {
	case RoleVault, RoleSite, RoleOperator, RoleMonitor:
		return nil
	}
	return fmt.Errorf("pki: role %q: want vault, site, operator or monitor", role)
}

// PeerOf reads the identity of a certificate: its one ferry:// URI SAN.
func PeerOf(cert *x509.Certificate) (Peer, error) {
	var found []Peer
	for _, u := range cert.URIs {
		if u.Scheme != URIScheme {
			continue
		}
		p := Peer{Role: u.Host, Name: strings.TrimPrefix(u.Path, "/")}
		if CheckRole(p.Role) != nil || p.Name == "" || strings.Contains(p.Name, "/") || u.RawQuery != "" || u.User != nil {
			return Peer{}, fmt.Errorf("%w: malformed identity %q", ErrNoIdentity, u)
		}
		found = append(found, p)
	}
	switch len(found) {
	case 0:
		return Peer{}, fmt.Errorf("%w (subject %q): reissue it with 'ferry ca issue --role ROLE NAME'", ErrNoIdentity, cert.Subject.CommonName)
	case 1:
		return found[0], nil
	}
	return Peer{}, fmt.Errorf("%w: %d identities in one certificate", ErrNoIdentity, len(found))
}

// Issue signs a certificate for the identity peer, with the given DNS names
// and IPs as subject alternative names (plus peer.Name as a DNS name), and
// writes NAME.crt and NAME.key into outDir. Vault and site certificates
// serve and call (server and client authentication); operator and
// monitor certificates only call (client authentication).
func Issue(caDir, outDir string, peer Peer, hosts []string, now time.Time) error {
	if err := CheckRole(peer.Role); err != nil {
		return err
	}
	if err := api.CheckName(api.KindIdentity, peer.Name); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	caCert, caKey, err := loadCA(caDir)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	usage := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if peer.Role == RoleVault || peer.Role == RoleSite {
		usage = append(usage, x509.ExtKeyUsageServerAuth)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: peer.Name, Organization: []string{"ferry"}, OrganizationalUnit: []string{peer.Role}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(2, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  usage,
		DNSNames:     []string{peer.Name},
		URIs:         []*url.URL{peer.URI()},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("sign certificate for %s: %w", peer, err)
	}
	if err := os.MkdirAll(outDir, 0o700); err != nil {
		return err
	}
	if err := writePair(outDir, peer.Name, der, key); err != nil {
		return err
	}
	// Each holder also needs the CA certificate to verify its peers.
	b, err := os.ReadFile(filepath.Join(caDir, CACert))
	if err != nil {
		return err
	}
	if filepath.Clean(outDir) != filepath.Clean(caDir) {
		return atomicfile.WriteFile(filepath.Join(outDir, CACert), b, 0o644)
	}
	return nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	return n
}

func writePair(dir, name string, der []byte, key *ecdsa.PrivateKey) error {
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, name+".key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		return fmt.Errorf("write key: %w", err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return fmt.Errorf("write certificate: %w", err)
	}
	return nil
}

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cb, err := os.ReadFile(filepath.Join(dir, CACert))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, ErrNoCA
	}
	if err != nil {
		return nil, nil, err
	}
	kb, err := os.ReadFile(filepath.Join(dir, CAKey))
	if err != nil {
		return nil, nil, fmt.Errorf("read CA key: %w", err)
	}
	cp, _ := pem.Decode(cb)
	kp, _ := pem.Decode(kb)
	if cp == nil || kp == nil {
		return nil, nil, fmt.Errorf("pki: CA files in %s are not PEM", dir)
	}
	cert, err := x509.ParseCertificate(cp.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse CA certificate: %w", err)
	}
	key, err := x509.ParseECPrivateKey(kp.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse CA key: %w", err)
	}
	return cert, key, nil
}

// Identity is a loaded certificate, the identity it names, and the CA
// pool to verify peers with.
type Identity struct {
	Name string
	Peer Peer
	Cert tls.Certificate
	Pool *x509.CertPool
}

// Load reads name.crt, name.key and ca.crt from dir. The certificate must
// name a ferry identity (PeerOf).
func Load(dir, name string) (*Identity, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"))
	if err != nil {
		return nil, fmt.Errorf("load certificate %q from %s (issue one with 'ferry ca issue'): %w", name, dir, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("parse certificate %q: %w", name, err)
	}
	peer, err := PeerOf(leaf)
	if err != nil {
		return nil, fmt.Errorf("certificate %s: %w", filepath.Join(dir, name+".crt"), err)
	}
	cb, err := os.ReadFile(filepath.Join(dir, CACert))
	if err != nil {
		return nil, fmt.Errorf("load CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(cb) {
		return nil, fmt.Errorf("pki: %s holds no certificate", filepath.Join(dir, CACert))
	}
	return &Identity{Name: name, Peer: peer, Cert: cert, Pool: pool}, nil
}

// Require checks that the identity has role (and, if name is not empty,
// that name), for a daemon to refuse to start with the wrong certificate.
func (id *Identity) Require(role, name string) error {
	if id.Peer.Role != role || (name != "" && id.Peer.Name != name) {
		want := Peer{Role: role, Name: name}
		if name == "" {
			want.Name = "*"
		}
		return fmt.Errorf("%w: certificate %q is %s, this needs %s (issue one with 'ferry ca issue --role %s %s')",
			ErrWrongPeer, id.Name, id.Peer, want, role, cmp.Or(name, "NAME"))
	}
	return nil
}

// ServerConfig requires TLS 1.3 and a client certificate signed by the CA.
// Which identities may call what is the server's routes' business
// (Verified gives them the caller's identity).
func (id *Identity) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.Cert},
		ClientCAs:    id.Pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}
}

// ClientConfig presents our certificate and verifies the server against
// the CA and its identity: its role must be want.Role and, if want.Name is
// not empty, its name want.Name (which is also the TLS server name).
func (id *Identity) ClientConfig(want Peer) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.Cert},
		RootCAs:      id.Pool,
		ServerName:   want.Name,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return fmt.Errorf("%w: no server certificate", ErrWrongPeer)
			}
			got, err := PeerOf(cs.PeerCertificates[0])
			if err != nil {
				return err
			}
			if got.Role != want.Role || (want.Name != "" && got.Name != want.Name) {
				return fmt.Errorf("%w: the server is %s, expected %s", ErrWrongPeer, got, want)
			}
			return nil
		},
	}
}

// Verified returns the identity of the client of a verified TLS
// connection (nil state or no verified chain: ErrNoIdentity).
func Verified(cs *tls.ConnectionState) (Peer, error) {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return Peer{}, fmt.Errorf("%w: no verified client certificate", ErrNoIdentity)
	}
	return PeerOf(cs.VerifiedChains[0][0])
}
