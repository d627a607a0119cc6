/** Where tokensvc is, asked of the app's backend at run time (one build serves any deployment). */
export interface ClientConfig {
  tokensvcUrl: string
}

let config: Promise<ClientConfig> | null = null

export function getConfig(): Promise<ClientConfig> {
  config ??= fetch('/api/config')
    .then(async (response) => {
      if (!response.ok) throw new Error(`/api/config answered ${response.status}`)
      const body = (await response.json()) as { tokensvc_url: string }
      return { tokensvcUrl: body.tokensvc_url.replace(/\/+$/, '') }
    })
    .catch((error: unknown) => {
      config = null // let a later call try again
      throw error
    })
  return config
}
