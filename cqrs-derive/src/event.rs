//! `#[derive(DomainEvent)]`.

use std::collections::HashSet;

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::{Attribute, Data, DeriveInput, Fields, LitInt, LitStr};

/// What `#[event(...)]` said on one item.
#[derive(Default)]
struct EventAttrs {
    name: Option<LitStr>,
    version: Option<u32>,
    category: Option<LitStr>,
}

fn parse_attrs(attrs: &[Attribute]) -> syn::Result<EventAttrs> {
    let mut parsed = EventAttrs::default();
    for attr in attrs.iter().filter(|attr| attr.path().is_ident("event")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                let name: LitStr = meta.value()?.parse()?;
                if name.value().is_empty() {
                    return Err(syn::Error::new(name.span(), "an event name cannot be empty"));
                }
                parsed.name = Some(name);
                Ok(())
            } else if meta.path.is_ident("version") {
                let version: LitInt = meta.value()?.parse()?;
                parsed.version = Some(version.base10_parse()?);
                Ok(())
            } else if meta.path.is_ident("category") {
                let category: LitStr = meta.value()?.parse()?;
                if category.value().is_empty() || category.value().contains('-') {
                    return Err(syn::Error::new(
                        category.span(),
                        "a category is a non-empty name without '-' (streams are named {category}-{id}), or \"*\"",
                    ));
                }
                parsed.category = Some(category);
                Ok(())
            } else {
                Err(meta.error("expected `name = \"...\"`, `version = N` or `category = \"...\"`"))
            }
        })?;
    }
    Ok(parsed)
}

/// One stored event type: its name, version, category (`None` = any) and Rust shape.
struct Variant<'a> {
    ident: &'a syn::Ident,
    name: String,
    version: u32,
    category: Option<String>,
    fields: &'a Fields,
}

pub(crate) fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    let container = parse_attrs(&input.attrs)?;
    match &input.data {
        Data::Enum(data) => {
            let default_version = container.version.unwrap_or(1);
            if container.name.is_some() {
                return Err(syn::Error::new_spanned(
                    &input.ident,
                    "`name` goes on each variant of an event enum, not on the enum",
                ));
            }
            let mut variants = Vec::new();
            let mut names = HashSet::new();
            for variant in &data.variants {
                let attrs = parse_attrs(&variant.attrs)?;
                let name = attrs.name.as_ref().map_or_else(|| variant.ident.to_string(), LitStr::value);
                if !names.insert(name.clone()) {
                    return Err(syn::Error::new_spanned(
                        &variant.ident,
                        format!("two variants are stored as {name:?}: give each its own #[event(name = \"...\")]"),
                    ));
                }
                let category = attrs.category.as_ref().or(container.category.as_ref()).ok_or_else(|| {
                    syn::Error::new_spanned(
                        &input.ident,
                        "add #[event(category = \"...\")]: the stream category of the aggregate that emits these \
                         events (or \"*\" for any category), so handlers take only its events",
                    )
                })?;
                variants.push(Variant {
                    ident: &variant.ident,
                    name,
                    version: attrs.version.unwrap_or(default_version),
                    category: any_category(category),
                    fields: &variant.fields,
                });
            }
            if variants.is_empty() {
                return Err(syn::Error::new_spanned(&input.ident, "an event enum needs at least one variant"));
            }
            Ok(expand_enum(input, &variants))
        }
        Data::Struct(_) => {
            let category = container.category.as_ref().ok_or_else(|| {
                syn::Error::new_spanned(
                    &input.ident,
                    "add #[event(category = \"...\")]: the stream category of the aggregate that emits this event \
                     (or \"*\" for any category)",
                )
            })?;
            let name = container.name.as_ref().map_or_else(|| input.ident.to_string(), LitStr::value);
            Ok(expand_struct(input, &name, container.version.unwrap_or(1), any_category(category)))
        }
        Data::Union(_) => Err(syn::Error::new_spanned(&input.ident, "DomainEvent cannot be derived for a union")),
    }
}

fn any_category(category: &LitStr) -> Option<String> {
    let category = category.value();
    (category != "*").then_some(category)
}

fn category_check(category: Option<&String>) -> TokenStream {
    match category {
        Some(category) => quote!(category == #category),
        None => quote!(true),
    }
}

fn expand_struct(input: &DeriveInput, name: &str, version: u32, category: Option<String>) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    let accepts = category_check(category.as_ref());
    quote! {
        #[automatically_derived]
        impl #impl_generics ::cqrs_core::DomainEvent for #ident #type_generics #where_clause {
            const EVENT_TYPES: &'static [&'static str] = &[#name];

            fn event_type(&self) -> &'static str {
                #name
            }

            fn schema_version(&self) -> u32 {
                #version
            }

            fn accepts(category: &str, event_type: &str) -> bool {
                event_type == #name && #accepts
            }

            fn encode(&self) -> ::core::result::Result<::cqrs_core::__private::Value, ::cqrs_core::__private::Error> {
                ::cqrs_core::__private::encode(self)
            }

            fn decode(
                event_type: &str,
                payload: &::cqrs_core::__private::Value,
            ) -> ::core::result::Result<Self, ::cqrs_core::__private::Error> {
                if event_type == #name {
                    ::cqrs_core::__private::decode(payload)
                } else {
                    ::core::result::Result::Err(::cqrs_core::__private::unknown_event_type(event_type))
                }
            }
        }
    }
}

fn expand_enum(input: &DeriveInput, variants: &[Variant<'_>]) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
    let patterns: Vec<TokenStream> = variants.iter().map(ignore_pattern).collect();
    let versions = variants.iter().map(|v| v.version);
    let accepts = variants.iter().map(|v| category_check(v.category.as_ref()));
    let encodes = variants.iter().map(encode_arm);
    let decodes = variants.iter().map(decode_arm);
    quote! {
        #[automatically_derived]
        impl #impl_generics ::cqrs_core::DomainEvent for #ident #type_generics #where_clause {
            const EVENT_TYPES: &'static [&'static str] = &[#(#names),*];

            fn event_type(&self) -> &'static str {
                match self {
                    #(#patterns => #names,)*
                }
            }

            fn schema_version(&self) -> u32 {
                match self {
                    #(#patterns => #versions,)*
                }
            }

            fn accepts(category: &str, event_type: &str) -> bool {
                match event_type {
                    #(#names => #accepts,)*
                    _ => false,
                }
            }

            fn encode(&self) -> ::core::result::Result<::cqrs_core::__private::Value, ::cqrs_core::__private::Error> {
                match self {
                    #(#encodes)*
                }
            }

            fn decode(
                event_type: &str,
                payload: &::cqrs_core::__private::Value,
            ) -> ::core::result::Result<Self, ::cqrs_core::__private::Error> {
                match event_type {
                    #(#decodes)*
                    other => ::core::result::Result::Err(::cqrs_core::__private::unknown_event_type(other)),
                }
            }
        }
    }
}

/// `Self::V { .. }`, `Self::V(..)` or `Self::V`.
fn ignore_pattern(variant: &Variant<'_>) -> TokenStream {
    let ident = variant.ident;
    match variant.fields {
        Fields::Named(_) => quote!(Self::#ident { .. }),
        Fields::Unnamed(_) => quote!(Self::#ident(..)),
        Fields::Unit => quote!(Self::#ident),
    }
}

fn encode_arm(variant: &Variant<'_>) -> TokenStream {
    let ident = variant.ident;
    match variant.fields {
        Fields::Named(fields) => {
            let idents: Vec<_> = fields.named.iter().filter_map(|f| f.ident.as_ref()).collect();
            let keys: Vec<String> = idents.iter().map(|i| unraw(i)).collect();
            quote! {
                Self::#ident { #(#idents),* } => {
                    let mut object = ::cqrs_core::__private::Map::new();
                    #(object.insert(#keys.to_owned(), ::cqrs_core::__private::encode(#idents)?);)*
                    ::core::result::Result::Ok(::cqrs_core::__private::Value::Object(object))
                }
            }
        }
        Fields::Unnamed(fields) if fields.unnamed.len() == 1 => quote! {
            Self::#ident(inner) => ::cqrs_core::__private::encode(inner),
        },
        Fields::Unnamed(fields) => {
            let bindings: Vec<_> = (0..fields.unnamed.len()).map(|i| format_ident!("field_{i}")).collect();
            quote! {
                Self::#ident(#(#bindings),*) => ::core::result::Result::Ok(::cqrs_core::__private::Value::Array(
                    ::std::vec![#(::cqrs_core::__private::encode(#bindings)?),*]
                )),
            }
        }
        Fields::Unit => quote! {
            Self::#ident => ::core::result::Result::Ok(
                ::cqrs_core::__private::Value::Object(::cqrs_core::__private::Map::new())
            ),
        },
    }
}

fn decode_arm(variant: &Variant<'_>) -> TokenStream {
    let ident = variant.ident;
    let name = &variant.name;
    match variant.fields {
        Fields::Named(fields) => {
            let idents: Vec<_> = fields.named.iter().filter_map(|f| f.ident.as_ref()).collect();
            let keys: Vec<String> = idents.iter().map(|i| unraw(i)).collect();
            quote! {
                #name => ::core::result::Result::Ok(Self::#ident {
                    #(#idents: ::cqrs_core::__private::field(payload, #keys)?,)*
                }),
            }
        }
        Fields::Unnamed(fields) if fields.unnamed.len() == 1 => quote! {
            #name => ::core::result::Result::Ok(Self::#ident(::cqrs_core::__private::decode(payload)?)),
        },
        Fields::Unnamed(fields) => {
            let count = fields.unnamed.len();
            let indexes = 0..count;
            quote! {
                #name => ::core::result::Result::Ok(Self::#ident(
                    #(::cqrs_core::__private::element(payload, #indexes, #count)?),*
                )),
            }
        }
        Fields::Unit => quote! {
            #name => ::core::result::Result::Ok(Self::#ident),
        },
    }
}

/// A field's JSON key: its name without a raw-identifier prefix (`r#type` → `type`).
fn unraw(ident: &syn::Ident) -> String {
    let name = ident.to_string();
    name.strip_prefix("r#").map(str::to_owned).unwrap_or(name)
}
