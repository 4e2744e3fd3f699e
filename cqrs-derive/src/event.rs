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
    /// `tags = path`: a function `fn(&Self) -> Vec<Tag>` whose tags are added.
    tags: Option<syn::Path>,
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
            } else if meta.path.is_ident("tags") {
                parsed.tags = Some(meta.value()?.parse()?);
                Ok(())
            } else {
                Err(meta.error(
                    "expected `name = \"...\"`, `version = N`, `category = \"...\"` or `tags = path::to::function`",
                ))
            }
        })?;
    }
    Ok(parsed)
}

/// The fields marked `#[event(tag = "kind")]`: each gives the tag `kind:{field}`.
fn tag_fields(fields: &Fields) -> syn::Result<Vec<(TokenStream, LitStr)>> {
    let mut tagged = Vec::new();
    for (index, field) in fields.iter().enumerate() {
        for attr in field.attrs.iter().filter(|attr| attr.path().is_ident("event")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("tag") {
                    let kind: LitStr = meta.value()?.parse()?;
                    if kind.value().is_empty() || kind.value().contains(':') {
                        return Err(syn::Error::new(kind.span(), "a tag kind is a non-empty name without ':'"));
                    }
                    let access = match &field.ident {
                        Some(ident) => quote!(#ident),
                        None => {
                            let binding = format_ident!("field_{index}");
                            quote!(#binding)
                        }
                    };
                    tagged.push((access, kind));
                    Ok(())
                } else {
                    Err(meta.error("on a field, expected `tag = \"kind\"`"))
                }
            })?;
        }
    }
    Ok(tagged)
}

/// One stored event type: its name, version, category (`None` = any) and Rust shape.
struct Variant<'a> {
    ident: &'a syn::Ident,
    name: String,
    version: u32,
    category: Option<String>,
    fields: &'a Fields,
    /// The tagged fields: how to name each in a pattern, and the tag's kind.
    tags: Vec<(TokenStream, LitStr)>,
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
                    tags: tag_fields(&variant.fields)?,
                });
            }
            if variants.is_empty() {
                return Err(syn::Error::new_spanned(&input.ident, "an event enum needs at least one variant"));
            }
            Ok(expand_enum(input, &variants, container.tags.as_ref()))
        }
        Data::Struct(data) => {
            let category = container.category.as_ref().ok_or_else(|| {
                syn::Error::new_spanned(
                    &input.ident,
                    "add #[event(category = \"...\")]: the stream category of the aggregate that emits this event \
                     (or \"*\" for any category)",
                )
            })?;
            let name = container.name.as_ref().map_or_else(|| input.ident.to_string(), LitStr::value);
            let variant = Variant {
                ident: &input.ident,
                name,
                version: container.version.unwrap_or(1),
                category: any_category(category),
                fields: &data.fields,
                tags: tag_fields(&data.fields)?,
            };
            Ok(expand_struct(input, &variant, container.tags.as_ref()))
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

/// `fn tags`: the tagged fields of the matched variant, then the `tags = path` function's.
fn tags_fn(arms: TokenStream, computed: Option<&syn::Path>) -> TokenStream {
    let computed = computed.map(|path| quote!(tags.extend(#path(self));));
    quote! {
        fn tags(&self) -> ::std::vec::Vec<::cqrs_core::Tag> {
            #[allow(unused_mut)]
            let mut tags: ::std::vec::Vec<::cqrs_core::Tag> = #arms;
            #computed
            tags
        }
    }
}

/// The tags of one variant's (or the struct's) bound fields.
fn field_tags(variant: &Variant<'_>) -> TokenStream {
    let (accesses, kinds): (Vec<_>, Vec<_>) = variant.tags.iter().cloned().unzip();
    quote!(::std::vec![#(::cqrs_core::Tag::new(#kinds, #accesses)),*])
}

/// A pattern binding the tagged fields of `variant`, rooted at `path` (`Self::V` or `Self`).
fn tag_pattern(path: TokenStream, variant: &Variant<'_>) -> TokenStream {
    let accesses = variant.tags.iter().map(|(access, _)| access);
    match variant.fields {
        Fields::Named(_) => quote!(#path { #(#accesses,)* .. }),
        Fields::Unnamed(fields) => {
            let slots = (0..fields.unnamed.len()).map(|index| {
                let binding = format_ident!("field_{index}");
                if variant.tags.iter().any(|(access, _)| binding == access.to_string()) {
                    quote!(#binding)
                } else {
                    quote!(_)
                }
            });
            quote!(#path(#(#slots),*))
        }
        Fields::Unit => path,
    }
}

fn expand_struct(input: &DeriveInput, variant: &Variant<'_>, computed: Option<&syn::Path>) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    let name = &variant.name;
    let version = variant.version;
    let accepts = category_check(variant.category.as_ref());
    let pattern = tag_pattern(quote!(Self), variant);
    let field_tags = field_tags(variant);
    let tags = tags_fn(quote!({ let #pattern = self; #field_tags }), computed);
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

            #tags

            fn encode(&self) -> ::core::result::Result<::cqrs_core::__private::Value, ::cqrs_core::__private::Error> {
                ::cqrs_core::__private::encode(self)
            }

            fn decode(
                event_type: &str,
                payload: &::cqrs_core::Payload,
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

fn expand_enum(input: &DeriveInput, variants: &[Variant<'_>], computed: Option<&syn::Path>) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
    let patterns: Vec<TokenStream> = variants.iter().map(ignore_pattern).collect();
    let versions = variants.iter().map(|v| v.version);
    let accepts = variants.iter().map(|v| category_check(v.category.as_ref()));
    let encodes = variants.iter().map(encode_arm);
    let decodes = variants.iter().map(decode_arm);
    let tag_arms = variants.iter().map(|variant| {
        let ident = variant.ident;
        let pattern = tag_pattern(quote!(Self::#ident), variant);
        let field_tags = field_tags(variant);
        quote!(#pattern => #field_tags,)
    });
    let tags = tags_fn(quote!(match self { #(#tag_arms)* }), computed);
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

            #tags

            fn encode(&self) -> ::core::result::Result<::cqrs_core::__private::Value, ::cqrs_core::__private::Error> {
                match self {
                    #(#encodes)*
                }
            }

            fn decode(
                event_type: &str,
                payload: &::cqrs_core::Payload,
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
                #name => {
                    #[allow(unused_variables)]
                    let fields = ::cqrs_core::__private::fields(payload)?;
                    ::core::result::Result::Ok(Self::#ident {
                        #(#idents: fields.field(#keys)?,)*
                    })
                }
            }
        }
        Fields::Unnamed(fields) if fields.unnamed.len() == 1 => quote! {
            #name => ::core::result::Result::Ok(Self::#ident(::cqrs_core::__private::decode(payload)?)),
        },
        Fields::Unnamed(fields) => {
            let count = fields.unnamed.len();
            let indexes = 0..count;
            quote! {
                #name => {
                    let elements = ::cqrs_core::__private::elements(payload, #count)?;
                    ::core::result::Result::Ok(Self::#ident(#(elements.element(#indexes)?),*))
                }
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
