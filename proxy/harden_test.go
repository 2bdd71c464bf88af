package proxy_test

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/portrait-proxy/portrait-proxy/imsim"
	"github.com/portrait-proxy/portrait-proxy/proxy"
)

// Without -callback-token the receiver is not there unless
// -callback-unsigned asks for it: a forged callback reaches nothing.
func TestCallbackReceiverOffWithoutToken(t *testing.T) {
	sim, srv := startSim(t, imsim.Config{})
	post := func(r *rig) int {
		body := `{"CallbackCommand":"Profile.CallbackPortraitSet","From_Account":"user1","EventTime":` +
			fmt.Sprint(time.Now().UnixMilli()) + `,"ProfileItem":[{"Tag":"Tag_Profile_Custom_Aa","Value":"x"}]}`
		resp, err := http.Post("http://"+r.p.Addr()+"/im/callback?SdkAppid="+fmt.Sprint(sim.SDKAppID())+"&CallbackCommand=Profile.CallbackPortraitSet",
			"application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := post(startProxy(t, sim, srv.URL, proxy.Config{})); code != http.StatusNotFound {
		t.Fatalf("no token, no -callback-unsigned: the receiver answered HTTP %d", code)
	}
	if code := post(startProxy(t, sim, srv.URL, proxy.Config{CallbackUnsigned: true})); code != http.StatusOK {
		t.Fatalf("-callback-unsigned: HTTP %d", code)
	}
}
